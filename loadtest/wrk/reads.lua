-- wrk: cached availability reads over the first KEYS catalog keys (uniform),
-- for the read ceiling. Env: MERCHANT (m1), KEYS (1000).
local merchant = os.getenv("MERCHANT") or "m1"
local keys = tonumber(os.getenv("KEYS") or "1000")
math.randomseed(os.time())
request = function()
  local sku = string.format("sku-%06d", math.random(0, keys - 1))
  return wrk.format("GET", "/v1/availability/" .. merchant .. "/" .. sku)
end
