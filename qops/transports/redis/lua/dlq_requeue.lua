-- Move one dead letter back to the head of its queue, atomically.
--
-- KEYS[1]  qops.dlq (hash: id -> JSON record)
-- KEYS[2]  qops.dlq.index (sorted set of ids)
-- KEYS[3]  the list to put it back on
-- ARGV[1]  dead-letter id
-- ARGV[2]  the raw payload (decoded from the record by the caller: Lua has no base64)
--
-- HDEL succeeds for one caller only, so two operators requeueing at once never
-- duplicate a message.

redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
    redis.call('RPUSH', KEYS[3], ARGV[2])
    return 1
end
return 0
