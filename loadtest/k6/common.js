// Shared by the k6 scenarios: hosts, keys, the API key and request helpers.
// Env: HOSTS (comma-separated gateway nodes), API_KEY, MERCHANT, LOCATION,
// KEYS (catalog size), HOT_PREFIX, HOT_KEYS, RATE (iterations/s), DURATION.
import http from 'k6/http';

export const hosts = (__ENV.HOSTS || 'http://127.0.0.1:8080,http://127.0.0.1:8081').split(',');
export const apiKey = __ENV.API_KEY || 'dev-admin-key';
export const merchant = __ENV.MERCHANT || 'm1';
export const location = __ENV.LOCATION || 'dc1';
export const keys = parseInt(__ENV.KEYS || '100000');
export const workingKeys = parseInt(__ENV.WORKING_KEYS || '1000');
export const hotPrefix = __ENV.HOT_PREFIX || 'hot';
export const hotKeys = parseInt(__ENV.HOT_KEYS || '3');
const run = __ENV.RUN || String(Date.now());

export function options(rate) {
  return {
    summaryTrendStats: ['p(50)', 'p(95)', 'p(99)', 'max'],
    scenarios: {
      constant: {
        executor: 'constant-arrival-rate',
        rate: parseInt(__ENV.RATE || String(rate)),
        timeUnit: '1s',
        duration: __ENV.DURATION || '30s',
        preAllocatedVUs: parseInt(__ENV.VUS || '32'),
        maxVUs: parseInt(__ENV.MAX_VUS || '256'),
      },
    },
  };
}

export function host() {
  return hosts[(__VU + __ITER) % hosts.length];
}

// Zipf-like pick (exponent 1) over n keys by inverse transform of the
// continuous approximation: index 0 is the most popular.
export function zipf(n) {
  const u = Math.random();
  return Math.min(n - 1, Math.floor(Math.exp(u * Math.log(n + 1))) - 1);
}

export function sku(index) {
  return 'sku-' + String(index).padStart(6, '0');
}

export function unique(kind) {
  return `k6-${kind}-${run}-${__VU}-${__ITER}`;
}

export function post(path, body, name, idempotencyKey) {
  const headers = { Authorization: `Bearer ${apiKey}`, 'Content-Type': 'application/json' };
  if (idempotencyKey) headers['Idempotency-Key'] = idempotencyKey;
  return http.post(`${host()}${path}`, JSON.stringify(body), {
    headers,
    tags: { name },
    responseCallback: http.expectedStatuses({ min: 200, max: 299 }, 409),
  });
}

export function get(path, name) {
  return http.get(`${host()}${path}`, {
    headers: { Authorization: `Bearer ${apiKey}` },
    tags: { name },
  });
}
