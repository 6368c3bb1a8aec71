// k6 reservations: one-line holds of qty 1 on one well-stocked SKU across
// all nodes, nothing else, so the percentiles are the reservation's alone
// (the bench's latency at 60% of the reservation ceiling). Env: SKU,
// TTL_SECONDS (60), and common.js's.
//   k6 run -e SKU=hot-ceiling -e RATE=3000 loadtest/k6/reserve.js
import * as c from './common.js';

export const options = c.options(1000);
const sku = __ENV.SKU || 'hot-ceiling';
const ttl = parseInt(__ENV.TTL_SECONDS || '60');

export default function () {
  const body = { merchant: c.merchant, lines: [{ sku, location: c.location, qty: 1 }], ttl_seconds: ttl };
  c.post('/v1/reservations', body, 'reserve', c.unique('reserve'));
}
