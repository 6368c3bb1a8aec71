// k6 checkout: carts of 2 to 4 lines on the working keys, committed (80%) or released.
//   k6 run -e WORKING_KEYS=1000 -e RATE=200 loadtest/k6/checkout.js
import * as c from './common.js';

export const options = c.options(200);

export default function () {
  const count = 2 + Math.floor(Math.random() * 3);
  const skus = new Set();
  while (skus.size < count) skus.add(c.sku(c.zipf(c.workingKeys)));
  const lines = [...skus].map((sku) => ({ sku, location: c.location, qty: 1 }));
  const res = c.post('/v1/reservations', { merchant: c.merchant, lines, ttl_seconds: 600 }, 'reserve', c.unique('cart'));
  if (res.status !== 201) return;
  const id = res.json('reservation_id');
  const action = Math.random() < 0.8 ? 'commit' : 'release';
  c.post(`/v1/reservations/${id}/${action}`, {}, action, c.unique(action));
}
