-- One part of a chord's header has ended: record it once, and claim the right to send
-- the body when it is the last part (docs/canvas.md, "The counter join").
-- KEYS: 1 <gid>.j (ZSET of parts, score = header index), 2 <gid>.t (extra parts),
--       3 <gid>.s (chord size), 4 <gid>.d (SET of "<task id>:<index>" recorded),
--       5 <gid> (the saved GroupResult, if any), 6 <gid>.c (claim token, or 'done')
-- ARGV: 1 "<task id>:<index>", 2 entry JSON, 3 score, 4 expiry (s, 0 = none),
--       5 expiry of the saved GroupResult (s, 0 = none), 6 claim (s), 7 claim token
-- Returns {parts recorded, parts expected (-1: size unknown), 1 if claimed else 0};
-- {-1, -1, 0} when the chord was completed already.
local j, t, s, d, g, c = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
if redis.call('GET', c) == 'done' then
  return {-1, -1, 0}
end
if redis.call('SADD', d, ARGV[1]) == 1 then
  redis.call('ZADD', j, ARGV[3], ARGV[2])
end
local ready = redis.call('ZCARD', j)
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  redis.call('EXPIRE', j, ttl)
  redis.call('EXPIRE', t, ttl)
  redis.call('EXPIRE', s, ttl)
  redis.call('EXPIRE', d, ttl)
  local gttl = tonumber(ARGV[5])
  if gttl > 0 then
    redis.call('EXPIRE', g, gttl)
  end
end
local size = redis.call('GET', s)
if not size then
  return {ready, -1, 0}
end
local total = tonumber(size) + tonumber(redis.call('GET', t) or '0')
if ready == total and redis.call('SET', c, ARGV[7], 'NX', 'EX', ARGV[6]) then
  return {ready, total, 1}
end
return {ready, total, 0}
