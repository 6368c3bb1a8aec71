// k6 ingest: +1 stock adjustments over HTTP on the working keys (k6 has no
// Kafka producer built in; the goose scenario sends half of its feed through
// Kafka).
//   k6 run -e RATE=300 loadtest/k6/ingest.js
import * as c from './common.js';

export const options = c.options(300);

export default function () {
  const event = {
    merchant: c.merchant, sku: c.sku(c.zipf(c.workingKeys)), location: c.location,
    kind: 'delta', qty: 1, source: 'k6', event_id: c.unique('event'),
  };
  c.post('/v1/stock/adjustments', event, 'adjustment');
}
