-- wrk: 3-line carts (qty 1 each) over the first KEYS catalog keys
-- (sku-000000 …), each a unique Idempotency-Key, so carts do not regress
-- while one-line holds get faster. Env: MERCHANT (m1), KEYS (1000), LOCATION
-- (dc1), API_KEY, RUN, TTL_SECONDS (60).
local merchant = os.getenv("MERCHANT") or "m1"
local keys = tonumber(os.getenv("KEYS") or "1000")
local location = os.getenv("LOCATION") or "dc1"
local api_key = os.getenv("API_KEY") or "dev-admin-key"
local run = os.getenv("RUN") or tostring(os.time())
local ttl = os.getenv("TTL_SECONDS") or "60"
local counter = 0
local threads = {}

setup = function(thread)
  thread:set("thread_id", #threads)
  table.insert(threads, thread)
end

local function line(index)
  return string.format('{"sku":"sku-%06d","location":"%s","qty":1}', index, location)
end

request = function()
  counter = counter + 1
  -- Three distinct keys: a cart names each key once.
  local first = math.random(0, keys - 3)
  local body = string.format('{"merchant":"%s","lines":[%s,%s,%s],"ttl_seconds":%s}',
    merchant, line(first), line(first + 1), line(first + 2), ttl)
  local headers = {
    ["Authorization"] = "Bearer " .. api_key,
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = string.format("wrk-cart-%s-%d-%d", run, thread_id or 0, counter),
  }
  return wrk.format("POST", "/v1/reservations", headers, body)
end

done = function(summary, latency, requests)
  io.write(string.format("non2xx_or_errors: %d\n",
    summary.errors.status + summary.errors.connect + summary.errors.read +
    summary.errors.write + summary.errors.timeout))
end
