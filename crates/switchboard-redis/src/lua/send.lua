-- KEYS: the user's session hash. ARGV: envelope, node liveness prefix, inbox prefix. Publishes
-- the envelope once to the inbox of every live node hosting the user; drops sessions of dead
-- nodes. Returns how many live sessions the user has.
local all = redis.call('HGETALL', KEYS[1])
local sessions = 0
local alive = {}
local sent = {}
for i = 1, #all, 2 do
  local node = all[i + 1]
  if alive[node] == nil then
    alive[node] = redis.call('EXISTS', ARGV[2] .. node) == 1
  end
  if alive[node] then
    sessions = sessions + 1
    if not sent[node] then
      sent[node] = true
      redis.call('PUBLISH', ARGV[3] .. node, ARGV[1])
    end
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return sessions
