-- Dead-letter one in-flight message: remove it from flight and store its record, atomically.
--
-- KEYS[1]  the consumer's in-flight list for that source
-- KEYS[2]  qops.dlq (hash: id -> JSON record)
-- KEYS[3]  qops.dlq.index (sorted set: id by time, for listing oldest first)
-- ARGV[1]  the raw payload
-- ARGV[2]  dead-letter id
-- ARGV[3]  the JSON record (built by the caller: it holds the payload base64-encoded)
-- ARGV[4]  the time, as the sorted-set score
--
-- Nothing is stored when the payload is no longer in flight (already given back to its
-- queue by close()/recover()): it will run again, so it must not be a dead letter too.

-- The record is written before the message leaves flight: a script that fails half-way
-- keeps what it already did, so a refused write (WRONGTYPE, out of memory) must leave
-- the message in flight, not lose it.
if redis.call('LPOS', KEYS[1], ARGV[1]) then
    redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
    redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
    redis.call('LREM', KEYS[1], -1, ARGV[1])
    return 1
end
return 0
