-- Put one in-flight message back at the head of the list it came from, atomically.
--
-- KEYS[1]  the consumer's in-flight list for that source
-- KEYS[2]  the source list
-- ARGV[1]  the raw payload
--
-- The push happens only if the payload was still in flight: a second call (a retried
-- command, or a message already given back by close()/recover()) pushes nothing, so a
-- message is never duplicated by requeueing it twice.

if redis.call('LREM', KEYS[1], -1, ARGV[1]) > 0 then
    -- RPUSH: consumers pop from the right, so this is the head of the queue.
    redis.call('RPUSH', KEYS[2], ARGV[1])
    return 1
end
return 0
