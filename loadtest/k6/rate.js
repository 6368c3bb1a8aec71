// k6: an open-loop, constant-arrival-rate GET of one URL (or of random
// catalog keys under BASE), for latency at a fixed rate. scripts/bench runs
// it at 60% of the ceiling wrk measured, against the bare hyper server and
// against the gateway's cached reads.
//   k6 run -e URL=http://127.0.0.1:18099/ -e RATE=20000 -e DURATION=10s loadtest/k6/rate.js
//   k6 run -e BASE=http://127.0.0.1:18080 -e KEYS=1000 -e RATE=20000 loadtest/k6/rate.js
import http from 'k6/http';

const rate = parseInt(__ENV.RATE || '1000');
export const options = {
  discardResponseBodies: true,
  summaryTrendStats: ['p(50)', 'p(95)', 'p(99)', 'max'],
  scenarios: {
    constant: {
      executor: 'constant-arrival-rate',
      rate: rate,
      timeUnit: '1s',
      duration: __ENV.DURATION || '10s',
      preAllocatedVUs: parseInt(__ENV.VUS || '64'),
      maxVUs: parseInt(__ENV.MAX_VUS || '256'),
    },
  },
};

const keys = parseInt(__ENV.KEYS || '1000');
const merchant = __ENV.MERCHANT || 'm1';

export default function () {
  if (__ENV.URL) {
    http.get(__ENV.URL);
  } else {
    const sku = 'sku-' + String(Math.floor(Math.random() * keys)).padStart(6, '0');
    http.get(`${__ENV.BASE}/v1/availability/${merchant}/${sku}`);
  }
}
