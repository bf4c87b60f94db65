-- wrk script: GET /v1/transactions/{referenceNumber} of transactions that exist.
-- References are those issue.lua made with RUN=REFRUN (default "fill"): "<REFRUN>-<t>-<n>"
-- for t in 1..REFTHREADS and n in 2..REFMAX (every such one got a 201 in the fill step; n = 1
-- is left out: wrk discards the first thread's first request(), so fill-1-1 was never sent).
-- Counts 200 / 404 / other and prints the totals in done().

local token = os.getenv("TOKEN") or ""
local refrun = os.getenv("REFRUN") or "fill"
local refthreads = tonumber(os.getenv("REFTHREADS") or "2")
local refmax = tonumber(os.getenv("REFMAX") or "1000")
local prefix = os.getenv("PREFIX") or "/v1/transactions/"
local threads = {}
local next_id = 1

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  found = 0
  missing = 0
  other = 0
  math.randomseed(id * 104729 + os.time())
  headers = { ["Authorization"] = "Bearer " .. token }
end

function request()
  local path = string.format("%s%s-%d-%d", prefix, refrun,
    math.random(1, refthreads), math.random(2, refmax))
  return wrk.format("GET", path, headers)
end

function response(status, headers, body)
  if status == 200 then
    found = found + 1
  elseif status == 404 then
    missing = missing + 1
  else
    other = other + 1
    if other <= 3 then
      io.stderr:write("status " .. status .. ": " .. body .. "\n")
    end
  end
end

function done(summary, latency, requests)
  local f, m, x = 0, 0, 0
  for _, t in ipairs(threads) do
    f = f + t:get("found")
    m = m + t:get("missing")
    x = x + t:get("other")
  end
  io.write(string.format("LUA status200=%d status404=%d other=%d\n", f, m, x))
end
