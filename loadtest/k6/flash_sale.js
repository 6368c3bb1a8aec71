// k6 flash-sale: holds on the hot keys across all nodes, then commit (60%),
// release (25%) or leave to expire (15%).
//   k6 run -e HOT_PREFIX=hot -e HOT_KEYS=3 -e RATE=300 loadtest/k6/flash_sale.js
import * as c from './common.js';

export const options = c.options(300);

export default function () {
  const hot = `${c.hotPrefix}-${Math.floor(Math.random() * c.hotKeys)}`;
  const body = { merchant: c.merchant, lines: [{ sku: hot, location: c.location, qty: 1 }], ttl_seconds: 5 };
  const res = c.post('/v1/reservations', body, 'reserve', c.unique('reserve'));
  if (res.status !== 201) return;
  const id = res.json('reservation_id');
  const roll = Math.random();
  if (roll < 0.6) {
    c.post(`/v1/reservations/${id}/commit`, {}, 'commit', c.unique('commit'));
  } else if (roll < 0.85) {
    c.post(`/v1/reservations/${id}/release`, {}, 'release', c.unique('release'));
  }
}
