-- Sent right behind a BLMOVE into an in-flight list, in the same write: whether the
-- message it moved there (the list's head: nothing else pushes onto a consumer's
-- in-flight list) has a worker-lost record, so that taking a message while idle costs
-- one round trip, not two. When the BLMOVE timed out the caller ignores the answer.
--
-- KEYS[1]  the consumer's in-flight list
-- ARGV[1]  the worker-lost key prefix ('<prefix>qops.lost.'; the rest is the payload's sha1)
--
-- Returns 1 when the head has a record, else 0.

local raw = redis.call('LINDEX', KEYS[1], 0)
if raw and redis.call('EXISTS', ARGV[1] .. redis.sha1hex(raw)) == 1 then
    return 1
end
return 0
