-- The first 8 hex digits of the server's run id: the generation of the Redis process. It changes
-- on every restart and differs between a primary and the replica promoted in its place, the two
-- events in which the newest writes can be lost. (A plain `find`: a pattern match over the
-- section costs more than the `INFO` call itself.)
local info = redis.call('INFO', 'server')
local at = string.find(info, 'run_id:', 1, true)
local gen = string.sub(info, at + 7, at + 14)
