-- Give every message a consumer holds back to its queue and unregister the consumer.
-- Used by close() (the consumer itself) and by recover() (a consumer whose heartbeat
-- expired). Atomic, so a message is always either in flight or back on its list.
--
-- KEYS[1]  qops.consumers
-- KEYS[2]  qops.alive.<cid> (heartbeat key, with a TTL)
-- KEYS[3]  qops.sources.<cid> (names of the lists the consumer took messages from)
-- KEYS[4]  qops.consumer.<cid> (hash describing the consumer)
-- ARGV[1]  consumer id
-- ARGV[2]  global key prefix ('' when none)
-- ARGV[3]  '1' = only if the consumer is dead (recover), '0' = unconditionally (close)
--
-- Returns how many messages went back, or -1 when the consumer is alive (then nothing
-- is touched: a live consumer's messages are never moved).
--
-- The in-flight list of source <name> is '<prefix>qops.unacked.<cid>/<name>' and the
-- source list itself '<prefix><name>': the record of where a message came from is the
-- list it sits in, so a message goes back exactly where it was taken even when its
-- routing key is not its queue's name (kombu's named exchanges) or it is not valid JSON.

if ARGV[3] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then
    return -1
end

local moved = 0
for _, name in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    local inflight = ARGV[2] .. 'qops.unacked.' .. ARGV[1] .. '/' .. name
    local dest = ARGV[2] .. name
    -- The in-flight list has the newest message on the left. Moving from the left to the
    -- right end (the head) of the queue leaves the oldest at the very head: the messages
    -- run again in the order they were first taken.
    while redis.call('LMOVE', inflight, dest, 'LEFT', 'RIGHT') do
        moved = moved + 1
    end
end

redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
redis.call('SREM', KEYS[1], ARGV[1])
return moved
