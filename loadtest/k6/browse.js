// k6 browse: availability reads, Zipf over the catalog, one in ten a batch of 20.
//   k6 run -e HOSTS=http://127.0.0.1:8080,http://127.0.0.1:8081 -e RATE=500 loadtest/k6/browse.js
import * as c from './common.js';

export const options = c.options(500);

export default function () {
  if (Math.random() < 0.1) {
    const items = [];
    for (let i = 0; i < 20; i++) {
      items.push({ merchant: c.merchant, sku: c.sku(c.zipf(c.keys)), location: c.location });
    }
    c.post('/v1/availability/batch', { items }, 'availability_batch');
  } else {
    c.get(`/v1/availability/${c.merchant}/${c.sku(c.zipf(c.keys))}`, 'availability');
  }
}
