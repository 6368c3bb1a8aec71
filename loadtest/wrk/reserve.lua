-- wrk: hot-SKU reservations (qty 1, unique Idempotency-Key per request), for
-- the reservation ceiling. Env: MERCHANT (m1), SKU, LOCATION (dc1), API_KEY,
-- RUN (makes keys unique across runs), TTL_SECONDS (60).
local merchant = os.getenv("MERCHANT") or "m1"
local sku = os.getenv("SKU") or "hot-ceiling"
local location = os.getenv("LOCATION") or "dc1"
local api_key = os.getenv("API_KEY") or "dev-admin-key"
local run = os.getenv("RUN") or tostring(os.time())
local ttl = os.getenv("TTL_SECONDS") or "60"
local body = string.format(
  '{"merchant":"%s","lines":[{"sku":"%s","location":"%s","qty":1}],"ttl_seconds":%s}',
  merchant, sku, location, ttl)
local counter = 0
local threads = {}

setup = function(thread)
  thread:set("thread_id", #threads)
  table.insert(threads, thread)
end

request = function()
  counter = counter + 1
  local headers = {
    ["Authorization"] = "Bearer " .. api_key,
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = string.format("wrk-%s-%d-%d", run, thread_id or 0, counter),
  }
  return wrk.format("POST", "/v1/reservations", headers, body)
end

done = function(summary, latency, requests)
  io.write(string.format("non2xx_or_errors: %d\n",
    summary.errors.status + summary.errors.connect + summary.errors.read +
    summary.errors.write + summary.errors.timeout))
end
