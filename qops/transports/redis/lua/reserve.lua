-- Settle the acked messages, then reserve up to `want` more for one consumer, in one
-- atomic step and one round trip.
--
-- Taking a message and recording it in flight happen in the same script, so no crash
-- (of the worker, the connection or Redis itself) can leave a message in neither place.
--
-- KEYS[1]        qops.consumers (set of registered consumer ids)
-- KEYS[2]        qops.sources.<cid> (set of list names this consumer may hold messages from)
-- KEYS[2k+1]     k-th candidate list, in service order (priority step first, then queue)
-- KEYS[2k+2]     the consumer's in-flight list for that candidate
-- ARGV[1]        n, the number of candidate lists
-- ARGV[2]        consumer id
-- ARGV[2+k]      name (without key prefix) of the k-th candidate list
-- ARGV[n+3]      how many messages to take at most (the room left under prefetch; 0 = none)
-- ARGV[n+4]      k of the list the caller will block on (BLMOVE) if nothing is ready, or 0
-- ARGV[n+5...]   acks, two arguments each: k of the list the message came from, payload
--
-- Returns a flat array {k, payload, k, payload, ...} of what was taken, in that order;
-- k is negative when the message has a worker-lost record (qops.lost.<sha1 of the
-- payload>: a node died holding it before, see qops/transports/redis/lost.py). Every
-- script that writes a record sets qops.lost, with an expiry no shorter than the
-- record's: without it there is none, and the SHA-1 of each payload is not computed.

local n = tonumber(ARGV[1])
local want = tonumber(ARGV[n + 3])
local wait = tonumber(ARGV[n + 4])
local out = {}
-- the key prefix: KEYS[1] is '<prefix>qops.consumers'
local lost = string.sub(KEYS[1], 1, #KEYS[1] - #'qops.consumers') .. 'qops.lost'
local any_lost = redis.call('EXISTS', lost) == 1
lost = lost .. '.'

-- Acks first: each removes one copy of its payload from the in-flight list it sits in,
-- scanning from the right, where the oldest messages are.
for i = n + 5, #ARGV, 2 do
    redis.call('LREM', KEYS[2 * tonumber(ARGV[i]) + 2], -1, ARGV[i + 1])
end

-- Re-register on every call: if this consumer was wrongly declared dead (recover() ran
-- while its heartbeat was late), what it takes now must still be findable by recover().
redis.call('SADD', KEYS[1], ARGV[2])

for k = 1, n do
    if want <= 0 then
        break
    end
    local got = redis.call('RPOP', KEYS[2 * k + 1], want)
    if got then
        local inflight = KEYS[2 * k + 2]
        for _, raw in ipairs(got) do
            -- LPUSH: the in-flight list holds the newest on the left, the oldest on the
            -- right, which is the order the restore script relies on.
            redis.call('LPUSH', inflight, raw)
            if any_lost and redis.call('EXISTS', lost .. redis.sha1hex(raw)) == 1 then
                out[#out + 1] = -k
            else
                out[#out + 1] = k
            end
            out[#out + 1] = raw
        end
        redis.call('SADD', KEYS[2], ARGV[2 + k])
        want = want - #got
    end
end

-- The caller is about to BLMOVE from this list into its in-flight list: record the
-- source first so that a message moved there is covered by recover() as well.
if #out == 0 and wait > 0 then
    redis.call('SADD', KEYS[2], ARGV[2 + wait])
end

return out
