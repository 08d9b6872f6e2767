-- Reserve up to ARGV[1] messages for one consumer, in one atomic step.
--
-- Taking a message and recording it in flight happen in the same script, so no crash
-- (of the worker, the connection or Redis itself) can leave a message in neither place.
--
-- KEYS[1]        qops.consumers (set of registered consumer ids)
-- KEYS[2]        qops.sources.<cid> (set of list names this consumer may hold messages from)
-- KEYS[2k+1]     k-th candidate list, in service order (priority step first, then queue)
-- KEYS[2k+2]     the consumer's in-flight list for that candidate
-- ARGV[1]        how many messages to take at most (the room left under prefetch)
-- ARGV[2]        consumer id
-- ARGV[3]        k of the list the caller will block on (BLMOVE) if nothing is ready, or 0
-- ARGV[3+k]      name (without key prefix) of the k-th candidate list
--
-- Returns a flat array {k, payload, k, payload, ...} in the order taken.

local want = tonumber(ARGV[1])
local n = (#KEYS - 2) / 2
local out = {}

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
            out[#out + 1] = k
            out[#out + 1] = raw
        end
        redis.call('SADD', KEYS[2], ARGV[3 + k])
        want = want - #got
    end
end

-- The caller is about to BLMOVE from this list into its in-flight list: record the
-- source first so that a message moved there is covered by recover() as well.
local wait = tonumber(ARGV[3])
if #out == 0 and wait > 0 then
    redis.call('SADD', KEYS[2], ARGV[3 + wait])
end

return out
