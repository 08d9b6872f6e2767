-- The claim on sending a chord's body (docs/canvas.md, "The counter join").
-- KEYS: 1 <gid>.c (claim), 2 <gid>.j, 3 <gid>.t, 4 <gid>.s, 5 <gid>.d
-- ARGV: 1 'extend' or 'done', 2 claim token, 3 seconds
-- extend: hold the claim ARGV[3] s longer, or take it again if it lapsed while the
--         chord is still there; done: drop the chord's keys and mark it 'done' for
--         ARGV[3] s (a late copy of a part then changes nothing). 1 if done, else 0.
local c = KEYS[1]
local owner = redis.call('GET', c)
if ARGV[1] == 'extend' then
  if owner == ARGV[2] then
    return redis.call('EXPIRE', c, ARGV[3])
  end
  if not owner and redis.call('EXISTS', KEYS[4]) == 1 then
    if redis.call('SET', c, ARGV[2], 'NX', 'EX', ARGV[3]) then
      return 1
    end
  end
  return 0
end
if owner ~= ARGV[2] then
  return 0
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('SET', c, 'done', 'EX', ARGV[3])
return 1
