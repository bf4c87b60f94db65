-- wrk script: POST an issue-points request with a referenceNumber unique per request.
-- Reference: "<RUN>-<thread>-<counter>", RUN from the environment (default "issue").
-- Env: TOKEN (bearer token), RUN, QUOTA (optional: a thread stops after QUOTA 201s and,
-- if DONE_DIR is set, creates DONE_DIR/<thread id> so that the caller can end wrk).
-- Counts responses by status in each thread and prints the totals in done(). Before
-- connecting, wrk calls request() once on its first thread (id 1) and discards the result:
-- that thread's counter 1 is never sent, hence "sent" below counts it out there.

local run = os.getenv("RUN") or "issue"
local token = os.getenv("TOKEN") or ""
local quota = tonumber(os.getenv("QUOTA") or "0")
local done_dir = os.getenv("DONE_DIR")
local threads = {}
local next_id = 1

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  counter = 0
  created = 0   -- 201
  ok = 0        -- 200 (a replay; the baseline's answer)
  other = 0     -- anything else
  math.randomseed(id * 7919 + os.time())
  headers = {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. token,
  }
end

function request()
  counter = counter + 1
  local value = math.random(1000, 999999)
  local body = string.format(
    '{"programId":"skywards","value":%d,"userId":"user-%06d",' ..
    '"referenceNumber":"%s-%d-%d","description":"Flat white and a croissant, table 12","bonus":false}',
    value, value % 1000000, run, id, counter)
  return wrk.format("POST", nil, headers, body)
end

function response(status, headers, body)
  if status == 201 then
    created = created + 1
    if quota > 0 and created == quota then
      if done_dir then
        local f = io.open(done_dir .. "/" .. id, "w")
        if f then f:close() end
      end
      wrk.thread:stop()
    end
  elseif status == 200 then
    ok = ok + 1
  else
    other = other + 1
    if other <= 3 then
      io.stderr:write("status " .. status .. ": " .. body .. "\n")
    end
  end
end

-- The requests of thread t that wrk discarded (see above).
function discarded(t)
  if t:get("id") == 1 then return 1 else return 0 end
end

function done(summary, latency, requests)
  local c, o, x, sent = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    c = c + t:get("created")
    o = o + t:get("ok")
    x = x + t:get("other")
    sent = sent + t:get("counter") - discarded(t)
  end
  io.write(string.format("LUA status201=%d status200=%d other=%d sent=%d\n", c, o, x, sent))
  for _, t in ipairs(threads) do
    io.write(string.format("LUA thread=%d sent=%d created=%d\n", t:get("id"), t:get("counter") - discarded(t), t:get("created")))
  end
end
