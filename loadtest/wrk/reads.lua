-- wrk: cached availability reads over the first KEYS catalog keys (uniform),
-- for the read ceiling. Env: MERCHANT (m1), KEYS (1000); URL_PATH, if set,
-- is requested every time instead (the same script's cost for a baseline).
local merchant = os.getenv("MERCHANT") or "m1"
local keys = tonumber(os.getenv("KEYS") or "1000")
math.randomseed(os.time())
local fixed = os.getenv("URL_PATH")
request = function()
  if fixed then return wrk.format("GET", fixed) end
  local sku = string.format("sku-%06d", math.random(0, keys - 1))
  return wrk.format("GET", "/v1/availability/" .. merchant .. "/" .. sku)
end
