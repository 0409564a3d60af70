-- KEYS: the session's link hash. ARGV: key hash, envelope ('' for none), node liveness prefix,
-- inbox prefix. Publishes the envelope (client frames for a fallback session) to the inbox
-- channel of the node holding the session, if that node is alive and the key hash is the link's.
-- Returns 1 (delivered; with no envelope: the session is there and the key right), 0 (no such
-- session on a live node; the link of a dead node is deleted) or -1 (wrong key).
local link = redis.call('HMGET', KEYS[1], 'n', 'k')
local node = link[1]
if not node then
  return 0
end
if redis.call('EXISTS', ARGV[3] .. node) == 0 then
  redis.call('DEL', KEYS[1])
  return 0
end
if link[2] ~= ARGV[1] then
  return -1
end
if ARGV[2] ~= '' then
  redis.call('PUBLISH', ARGV[4] .. node, ARGV[2])
end
return 1
