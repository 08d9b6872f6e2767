-- Record that a worker starts an acks_late task (its worker-lost record, see
-- qops/transports/redis/lost.py), in one command and one round trip, after settling
-- what the worker finished since its last round trip: delete their records, and apply
-- their acks when the caller may (it holds the consumer's wire: qops/transports/redis/
-- consumer.py). So when a task kills its process, the tasks that ended before it are
-- neither counted as worker losses nor (acked here) run again.
--
-- KEYS[1]               qops.lost.<sha1> of the task that starts
-- KEYS[2 .. c+1]        records to delete (c = ARGV[3]): tasks acked or dead-lettered
-- KEYS[c+2 ...]         in-flight list of each ack, in the order of ARGV[4...]
-- ARGV[1]               consumer id (the record's `running`)
-- ARGV[2]               seconds the record is kept after its last change
-- ARGV[3]               c
-- ARGV[4 ...]           payloads acked: one copy of each is removed from its list
--
-- The deletes come first: a message started again right after a copy of it (same
-- payload, same record) was acked keeps its new record. Returns 1.

local c = tonumber(ARGV[3])
if c > 0 then
    redis.call('DEL', unpack(KEYS, 2, c + 1))
end
for i = 4, #ARGV do
    redis.call('LREM', KEYS[c + i - 2], -1, ARGV[i])
end
redis.call('HSET', KEYS[1], 'running', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
-- '<prefix>qops.lost' (KEYS[1] up to its last dot): some record may exist (reserve.lua)
redis.call('SET', string.match(KEYS[1], '^(.*)%.'), '1', 'EX', ARGV[2])
return 1
