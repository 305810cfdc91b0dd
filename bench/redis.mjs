// The ioredis options for a Redis URL, shared by producer.mjs and node_worker.mjs. An options
// object, not a client: BullMQ then opens the connections each Queue or Worker needs.
// redis:// or rediss:// (TLS), user:password@ percent-decoded, /db honoured.
export function redisOptions(url) {
  const u = new URL(url);
  return {
    host: u.hostname,
    port: Number(u.port || 6379),
    db: Number(u.pathname.slice(1) || 0),
    username: u.username ? decodeURIComponent(u.username) : undefined,
    password: u.password ? decodeURIComponent(u.password) : undefined,
    tls: u.protocol === 'rediss:' ? {} : undefined,
  };
}
