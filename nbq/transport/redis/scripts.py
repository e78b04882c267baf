"""The Lua scripts: each an atomic step on the keys of keys.py (ARGV[1] is the prefix)."""
from __future__ import annotations


def taken(entry: list) -> tuple:
    """(queue key, entry id, fields) of an entry a script took: [key, id, [name, value, ...]]."""
    qk, eid, flat = entry
    return qk.decode(), eid, dict(zip(flat[::2], flat[1::2]))


# Shared by the scripts below: messages to clients, starting entries, taking more for a worker.
SHARED = """
local function send(p, ttl, c, blob)  -- a packed message to client c's result stream
  local sk = p .. 'rs:' .. c
  redis.call('XADD', sk, '*', 'm', blob); redis.call('EXPIRE', sk, ttl)
end

-- XADD of ARGV[i] (queue key), ARGV[i + 1] (n), n names and values; -> next i, and the entry's
-- id if it has frames stored apart (field b), else nil
local function add(i)
  local nf = tonumber(ARGV[i + 1])
  local args = {'XADD', ARGV[i], '*'}
  local big = false
  for k = 1, nf do
    args[#args + 1] = ARGV[i + 1 + k]
    big = big or (k % 2 == 1 and ARGV[i + 1 + k] == 'b')
  end
  local eid = redis.call(unpack(args))
  return i + 2 + nf, big and eid or nil
end

-- false: revoked, or refused as a replay (acked, deleted, counted), never run.  A replay is
-- an entry of a task that is done, or started by another entry that still exists (st: names
-- the entry that started it: "queue key entry id"); an entry re-queued after a death or a
-- goodbye replaces one that is deleted, so it starts.
local function start(p, ttl, qk, eid, tid)
  local sk, mark = p .. 'st:' .. tid, qk .. ' ' .. eid
  local replay = redis.call('ZSCORE', p .. 'done', tid)
  if not replay then
    local was = redis.call('GET', sk)
    if was and was ~= mark then
      local wq, we = string.match(was, '^(.*) (%S+)$')
      local got = wq and redis.pcall('XRANGE', wq, we, we)
      replay = type(got) == 'table' and got.err == nil and #got > 0
    end
  end
  if replay or redis.call('EXISTS', p .. 'rv:' .. tid) == 1 then
    redis.call('XACK', qk, 'nbq', eid); redis.call('XDEL', qk, eid)
    if replay then redis.call('HINCRBY', p .. 'bad', 'replay', 1) end
    return false
  end
  redis.call('SET', sk, mark, 'EX', ttl)
  return true
end

local function task_item(fields)  -- the header's task, unverified: it only guides batching
  for k = 1, #fields, 2 do
    if fields[k] == 'h' then
      local ok, header = pcall(cjson.decode, fields[k + 1])
      if ok and type(header) == 'table' and type(header.t) == 'table'
          and type(header.t[1]) == 'table' and type(header.t[1].id) == 'string' then
        return header.t[1]
      end
    end
  end
  return nil
end

local function routed(p, qk, item)  -- whether the header's queue and priority name stream qk
  local q, pr = item.q or 'default', item.pr or 0
  if type(q) ~= 'string' or type(pr) ~= 'number' then return false end
  local base = p .. 'q:' .. q
  return qk == (pr == 0 and base or base .. ':p' .. pr) or qk == base .. ':p' .. pr .. 'r'
end

-- Up to n entries for consumer wid from the first of the queues qks that has any, read
-- one at a time and started unless revoked, stopping after one whose function is not h
-- (so a batch of quick tasks ends with at most one other).  -> {{queue key, id, fields}*}
-- An entry whose header does not parse, or names another stream than its own, is returned
-- unstarted, for the worker to drop.
local function take(p, ttl, wid, qks, n, h)
  local out = {}
  for _, qk in ipairs(qks) do
    while n > 0 do
      local got = redis.call('XREADGROUP', 'GROUP', 'nbq', wid, 'COUNT', 1, 'STREAMS', qk, '>')
      if not got then break end
      local eid, fields = got[1][2][1][1], got[1][2][1][2]
      local item = task_item(fields)
      if item ~= nil and not routed(p, qk, item) then item = nil end
      n = n - 1
      if item == nil or start(p, ttl, qk, eid, item.id) then out[#out + 1] = {qk, eid, fields} end
      if item == nil or item.h ~= h then n = 0 end
    end
    if #out > 0 then break end
  end
  return out
end
"""

# ARGV: prefix, ttl, now, nparts, [task id, owner client, to owner (0/1), packed part]*,
#       nmsg, [client, packed]*, nadd, [queue key, 2 x nfields, (name, value)*]*,
#       nack, [queue key, entry id, task id]*, trim done (0/1), worker id, ntake, function hash,
#       nqueues, queue*
# -> the entries taken for the worker's next batch (SHARED's take), from the queues' streams
# in the worker's order, each queue's most urgent first (as queue_streams)
REPORT = SHARED + """
local function streams(p, queues)
  local out = {}
  for _, q in ipairs(queues) do
    local lanes = redis.call('SMEMBERS', p .. 'qp:' .. q)
    table.sort(lanes, function(a, b) return a > b end)
    for _, lane in ipairs(lanes) do out[#out + 1] = p .. 'q:' .. q .. ':p' .. lane end
    out[#out + 1] = p .. 'q:' .. q
  end
  return out
end

local p, ttl, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local i = 4
local n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local tid, owner, tell, blob = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]; i = i + 4
  local rk = p .. 'r:' .. tid
  redis.call('RPUSH', rk, blob); redis.call('EXPIRE', rk, ttl)
  for _, w in ipairs(redis.call('SMEMBERS', p .. 'wt:' .. tid)) do
    if w ~= owner then send(p, ttl, w, blob) end
  end
  if tell == '1' then send(p, ttl, owner, blob) end
end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do send(p, ttl, ARGV[i], ARGV[i + 1]); i = i + 2 end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do i = add(i) end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local qk, eid, tid = ARGV[i], ARGV[i + 1], ARGV[i + 2]; i = i + 3
  redis.call('XACK', qk, 'nbq', eid); redis.call('XDEL', qk, eid)
  if tid ~= '' then redis.call('ZADD', p .. 'done', now, tid); redis.call('DEL', p .. 'o:' .. tid) end
end
if ARGV[i] == '1' then redis.call('ZREMRANGEBYSCORE', p .. 'done', '-inf', now - ttl) end
local wid, ntake, h = ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
local queues = {}
for k = 1, tonumber(ARGV[i + 4]) do queues[k] = ARGV[i + 4 + k] end
return take(p, ttl, wid, streams(p, queues), ntake, h)
"""

# ARGV: prefix, ttl, worker id, queue key, entry id, task id, nmore, function hash
# -> {1 (run it) or 0 (revoked: acked and deleted, never run), taken entries...}: when it
# runs, up to nmore entries more of its queue join its batch (SHARED's take)
START = SHARED + """
local p, ttl, wid, qk = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
if not start(p, ttl, qk, ARGV[5], ARGV[6]) then return {0} end
local out = take(p, ttl, wid, {qk}, tonumber(ARGV[7]), ARGV[8])
table.insert(out, 1, 1)
return out
"""

# ARGV: prefix, ttl, worker id, nstreams, [queue key, entry id]*, nfn, [function hash, batch]*
# Sent behind the worker's blocking XREADGROUP, in the same write, so that what it delivered
# starts without a round trip more: the entries pending on the worker past the id it had last
# of each stream (delivered once: none claimed), in the streams' order, and the first of them
# started as START starts, with up to its function's batch - 1 more of its queue taken.
# -> {} (none), or {flag, {delivered...}, {taken...}}, entries as take's: flag 1 started,
# 0 revoked or a replay (acked, deleted, never run), 2 not started (a header that does not
# parse or names another stream: the worker verifies it, and drops it or STARTs it)
PICKUP = SHARED + """
local p, ttl, wid, ns = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local got = {}
for k = 0, ns - 1 do
  local qk = ARGV[5 + 2 * k]
  for _, pe in ipairs(redis.call('XPENDING', qk, 'nbq', '(' .. ARGV[6 + 2 * k], '+', 16, wid)) do
    local e = pe[4] == 1 and redis.call('XRANGE', qk, pe[1], pe[1]) or {}
    if #e > 0 then got[#got + 1] = {qk, pe[1], e[1][2]} end
  end
end
if #got == 0 then return {} end
local i, batch = 5 + 2 * ns, {}
for k = 1, tonumber(ARGV[i]) do batch[ARGV[i + 2 * k - 1]] = tonumber(ARGV[i + 2 * k]) end
local qk, eid = got[1][1], got[1][2]
local item = task_item(got[1][3])
if item == nil or not routed(p, qk, item) then return {2, got, {}} end
if not start(p, ttl, qk, eid, item.id) then return {0, got, {}} end
local h = type(item.h) == 'string' and item.h or ''
return {1, got, take(p, ttl, wid, {qk}, (batch[h] or 1) - 1, h)}
"""

# ARGV: prefix, ttl, client, nfn, function hash*, ntask, [task id, queue key, 2 x nfields,
#       (name, value)*]*: a client's tasks added with their owner (o:), their functions kept
# -> {task id, entry id}* of the tasks with frames stored apart (the client keeps them: see
# RedisClient._dropped)
SUBMIT = SHARED + """
local p, ttl, c = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local i = 5
for _ = 1, tonumber(ARGV[4]) do redis.call('EXPIRE', p .. 'fn:' .. ARGV[i], ttl); i = i + 1 end
local n = tonumber(ARGV[i]); i = i + 1
local out = {}
for _ = 1, n do
  local tid = ARGV[i]
  redis.call('SET', p .. 'o:' .. tid, c, 'EX', ttl)
  local eid
  i, eid = add(i + 1)
  if eid then out[#out + 1] = tid; out[#out + 1] = eid end
end
return out
"""

# ARGV: prefix, ttl, cancelling client, n, [task id, packed revoked part]*
# -> per task 1 (cancelled) or 0.  The owner (o:) and watchers other than the
# cancelling client get the revoked part on their result streams, as from the ZeroMQ broker.
CANCEL = SHARED + """
local p, ttl, by = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local i = 5
local out = {}
for k = 1, tonumber(ARGV[4]) do
  local tid, blob = ARGV[i], ARGV[i + 1]; i = i + 2
  if redis.call('EXISTS', p .. 'st:' .. tid) == 1 or redis.call('EXISTS', p .. 'r:' .. tid) == 1 then
    out[k] = 0
  else
    redis.call('SET', p .. 'rv:' .. tid, '1', 'EX', ttl)
    redis.call('RPUSH', p .. 'r:' .. tid, blob); redis.call('EXPIRE', p .. 'r:' .. tid, ttl)
    local tell = redis.call('SMEMBERS', p .. 'wt:' .. tid)
    tell[#tell + 1] = redis.call('GET', p .. 'o:' .. tid)
    redis.call('DEL', p .. 'o:' .. tid)
    for _, c in ipairs(tell) do
      if c and c ~= by then send(p, ttl, c, blob) end
    end
    out[k] = 1
  end
end
return out
"""

# ARGV: prefix, ttl, key, member, total -> 1 for the one call that completed the join, else 0
JOIN = """
local p, ttl, key = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local members = p .. 'jn:' .. key
redis.call('SADD', members, ARGV[4]); redis.call('EXPIRE', members, ttl)
if redis.call('SCARD', members) >= tonumber(ARGV[5])
   and redis.call('SET', p .. 'jf:' .. key, '1', 'NX', 'EX', ttl) then
  return 1
end
return 0
"""

# ARGV: prefix, ttl, task id, state (RETRY or STARTED), packed ``state`` message[, "if": only
# if the task waits for a retry]: a worker's notice for a retry; rt: marks the task RETRY for later watchers (or no more), and the owner
# (o:) and watchers (wt:) get the message on their result streams, once each.  Retries only.
NOTICE = SHARED + """
local p, ttl, tid, state, msg = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
if state == 'RETRY' then
  redis.call('SET', p .. 'rt:' .. tid, '1', 'EX', ttl)
elseif redis.call('DEL', p .. 'rt:' .. tid) == 0 and ARGV[6] == 'if' then
  return 0  -- only if it was waiting for a retry: a task re-queued after its worker died
end
local to = {}
local owner = redis.call('GET', p .. 'o:' .. tid)
if owner then to[owner] = true end
for _, c in ipairs(redis.call('SMEMBERS', p .. 'wt:' .. tid)) do to[c] = true end
for c in pairs(to) do send(p, ttl, c, msg) end
return 1
"""

# ARGV: prefix, ttl, n, [queue key, entry id, reason, client, packed ``dropped`` notice]*:
# entries dropped as bad (they failed to parse, read or verify; or named another stream):
# acknowledged, deleted, counted in bad by reason.  A started mark (st:) the entry set itself
# (take starts entries before the worker verifies them) is removed: an unverified entry leaves
# no state behind.  The notice goes to the client its header names, if that client is connected
# (wk:): it acts on it only if the entry was its own (RedisClient._dropped).
DROP = SHARED + """
local p, ttl = ARGV[1], tonumber(ARGV[2])
local i = 4
for _ = 1, tonumber(ARGV[3]) do
  local qk, eid, why, c, notice = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  i = i + 5
  local got = redis.call('XRANGE', qk, eid, eid)
  local item = #got > 0 and task_item(got[1][2])
  if item and redis.call('GET', p .. 'st:' .. item.id) == qk .. ' ' .. eid then
    redis.call('DEL', p .. 'st:' .. item.id)
  end
  redis.call('XACK', qk, 'nbq', eid); redis.call('XDEL', qk, eid)
  redis.call('HINCRBY', p .. 'bad', why, 1)
  if c ~= '' and redis.call('EXISTS', p .. 'wk:' .. c) == 1 then send(p, ttl, c, notice) end
end
"""

# ARGV: prefix, budget, now, ttl, n, [task id, bytes, keys (space-separated)]*: results with
# frames stored apart, read from a result stream (the first reader registers each part once),
# kept for by-id lookups: while the kept bytes pass the budget, the result kept first loses its
# result list (r:) and its stored-apart frames.  Entries older than ttl (gone by expiry) are
# forgotten, so kept: holds no more than a day of large results.
KEEP = """
local p, budget, now, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local kept, sizes, total = p .. 'kept', p .. 'kept:sz', p .. 'kept:bytes'
local function forget(tid, evict)
  local v = redis.call('HGET', sizes, tid)
  redis.call('ZREM', kept, tid); redis.call('HDEL', sizes, tid)
  if not v then return end
  local first = true
  for w in string.gmatch(v, '%S+') do
    if first then redis.call('DECRBY', total, tonumber(w)); first = false
    elseif evict then redis.call('DEL', w) end
  end
  if evict then redis.call('DEL', p .. 'r:' .. tid) end
end
local i = 6
for _ = 1, tonumber(ARGV[5]) do
  local tid, n, keys = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]; i = i + 3
  local v = redis.call('HGET', sizes, tid) or '0'
  if not string.find(v, keys, 1, true) then  -- a part registered once, by its first reader
    local size = tonumber(string.match(v, '^%d+')) + n
    redis.call('HSET', sizes, tid, size .. string.sub(v, #string.match(v, '^%d+') + 1) .. ' ' .. keys)
    redis.call('ZADD', kept, 'NX', now, tid); redis.call('INCRBY', total, n)
  end
end
for _, tid in ipairs(redis.call('ZRANGEBYSCORE', kept, '-inf', now - ttl, 'LIMIT', 0, 100)) do
  forget(tid, false)
end
while tonumber(redis.call('GET', total) or '0') > budget do
  local oldest = redis.call('ZRANGE', kept, 0, 0)
  if #oldest == 0 then redis.call('DEL', total); break end
  forget(oldest[1], true)
end
for _, k in ipairs({kept, sizes, total}) do redis.call('EXPIRE', k, math.ceil(ttl)) end
"""
