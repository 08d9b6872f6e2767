-- Count a worker loss of one message, atomically (qops/worker/lost.py; the key is in
-- docs/protocol.md section 2).
--
-- KEYS[1]  qops.lost.<sha1 of the payload> (hash: running = consumer id that started it,
--          count = worker losses so far)
-- ARGV[1]  '1' = the caller saw the process running it die, '0' = it was redelivered
-- ARGV[2]  seconds the record is kept after its last change
--
-- A start (field running) that was never settled is one loss; so is a seen death.
-- Returns {count, 1 if this call counted one else 0}.

local started = redis.call('HEXISTS', KEYS[1], 'running') == 1
if started or ARGV[1] == '1' then
    local n = redis.call('HINCRBY', KEYS[1], 'count', 1)
    redis.call('HDEL', KEYS[1], 'running')
    redis.call('EXPIRE', KEYS[1], ARGV[2])
    -- '<prefix>qops.lost' (KEYS[1] up to its last dot): some record may exist (reserve.lua)
    redis.call('SET', string.match(KEYS[1], '^(.*)%.'), '1', 'EX', ARGV[2])
    return {n, 1}
end
return {tonumber(redis.call('HGET', KEYS[1], 'count') or '0'), 0}
