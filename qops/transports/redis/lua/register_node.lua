-- Node ARGV[1] is alive for ARGV[2] more seconds (the worker's heartbeat).
--
-- KEYS[1]  qops.nodes (sorted set: node name -> alive until, unix time)
-- KEYS[2]  qops.nodes.info (hash: node name -> JSON info)
-- ARGV[1]  node name
-- ARGV[2]  ttl in seconds
-- ARGV[3]  the info as JSON
--
-- The time is the server's (TIME), as in live_nodes.lua: hosts whose clocks
-- disagree still agree on who is alive.

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
