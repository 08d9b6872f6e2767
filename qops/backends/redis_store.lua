-- Store a task result unless a SUCCESS is already stored, and wake waiters.
-- KEYS[1] result key; ARGV[1] meta JSON; ARGV[2] expiry in seconds (0 = keep).
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
    return 0
  end
end
local ttl = tonumber(ARGV[2])
if ttl and ttl > 0 then
  redis.call('SETEX', KEYS[1], ttl, ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
-- Celery clients subscribe to the key's own name to wake at once.
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
