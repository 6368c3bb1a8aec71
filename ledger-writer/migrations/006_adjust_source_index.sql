-- `ledger-writer compensate` reads one source's adjust entries, and its
-- compensation source's: without an index that is a scan of every day of
-- the ledger (on the stack's 1.3M rows, 335 ms against 0.9 ms with it).
-- Partial: adjustments are a small share of the entries, so the relay's
-- inserts of the rest do not maintain it. Built in the migration's
-- transaction, it holds the ledger's inserts while it reads every day once
-- (about 3M rows a second here): the relay waits, entries stay in the
-- outbox, and the writer lag grows for that long, once, at the upgrade.
CREATE INDEX ledger_adjust_source ON ledger (source, at) WHERE op = 'adjust';
