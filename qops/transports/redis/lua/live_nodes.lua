-- The names of the nodes alive now (see register_node.lua).
--
-- KEYS[1]  qops.nodes (sorted set: node name -> alive until, unix time)
-- KEYS[2]  qops.nodes.info (hash: node name -> JSON info)
-- ARGV[1]  '1' = also forget (some of) the nodes that expired, '0' = only read
--
-- The forgetting is occasional (the caller decides) and bounded per call.

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if ARGV[1] == '1' then
    local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, 500)
    if #dead > 0 then
        redis.call('ZREM', KEYS[1], unpack(dead))
        redis.call('HDEL', KEYS[2], unpack(dead))
    end
end
return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
