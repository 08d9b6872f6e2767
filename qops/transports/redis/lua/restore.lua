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
-- ARGV[4]  seconds a worker-lost record is kept after its last change
--
-- Returns how many messages went back, or -1 when the consumer is alive (then nothing
-- is touched: a live consumer's messages are never moved).
--
-- A dead consumer whose hash says `unseen` (its tasks ran in its own process: solo and
-- threads pools, qops/transports/redis/lost.py) may have been running any message it
-- held that had no worker-lost record: those start without writing one (unwatched).
-- Each of them gets a record now, `running` = '?', so that its next delivery counts
-- this death and runs it watched. A message that has a record keeps it as it is (it
-- was watched: its `running` tells whether it had started).
--
-- The in-flight list of source <name> is '<prefix>qops.unacked.<cid>/<name>' and the
-- source list itself '<prefix><name>': the record of where a message came from is the
-- list it sits in, so a message goes back exactly where it was taken even when its
-- routing key is not its queue's name (kombu's named exchanges) or it is not valid JSON.

if ARGV[3] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then
    return -1
end

local unseen = ARGV[3] == '1' and redis.call('HGET', KEYS[4], 'unseen') == '1'
local lost = ARGV[2] .. 'qops.lost'  -- set: some record may exist (reserve.lua)
local moved = 0
for _, name in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    local inflight = ARGV[2] .. 'qops.unacked.' .. ARGV[1] .. '/' .. name
    local dest = ARGV[2] .. name
    -- The in-flight list has the newest message on the left. Moving from the left to the
    -- right end (the head) of the queue leaves the oldest at the very head: the messages
    -- run again in the order they were first taken.
    while true do
        local raw = redis.call('LMOVE', inflight, dest, 'LEFT', 'RIGHT')
        if not raw then
            break
        end
        moved = moved + 1
        if unseen then
            local key = lost .. '.' .. redis.sha1hex(raw)
            if redis.call('EXISTS', key) == 0 then
                redis.call('HSET', key, 'running', '?')
                redis.call('EXPIRE', key, ARGV[4])
            end
        end
    end
end
-- every message moved above has a record now: the reserve must look for them (also
-- for a record an older qops wrote without setting this key)
if unseen and moved > 0 then
    redis.call('SET', lost, '1', 'EX', ARGV[4])
end

redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
redis.call('SREM', KEYS[1], ARGV[1])
return moved
