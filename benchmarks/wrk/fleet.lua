-- A quiet fleet's device requests, devices taken round-robin, each with its own credential:
--   poll       GET {prefix}/{id}/desired with the device's current ETag in If-None-Match (a 304 when nothing
--              changed);
--   heartbeat  POST {prefix}/{id}/status with a minimal StatusReport (no events); the server commits each report
--              before it answers 200.
--
--   wrk -t1 -c16 -d10s -s benchmarks/wrk/fleet.lua http://127.0.0.1:8080 -- FLEET_FILE poll|heartbeat [PREFIX]
--
-- FLEET_FILE has one device a line: "<device id> <credential> <etag>" (benchmarks/capacity.py writes it).
-- PREFIX defaults to /api/v1/devices (the bare FastAPI baseline uses /bare). done() prints one line
-- "wrk-json {...}" with the request count, duration, socket errors, statuses and latency percentiles.

local requests = {}
local next_index = 0
statuses = {}

local threads = {}

function setup(thread)
   table.insert(threads, thread)
   thread:set("thread_number", #threads)
end

local body = '{"phase": "serving", "health": "ok", "agent_version": "wrk-bench", "events": []}'

function init(args)
   local fleet, endpoint, prefix = args[1], args[2], args[3] or "/api/v1/devices"
   assert(endpoint == "poll" or endpoint == "heartbeat", "the second argument is poll or heartbeat")
   for line in io.lines(fleet) do
      local id, credential, etag = line:match("^(%S+) (%S+) ?(%S*)$")
      if id then
         local headers = { ["Authorization"] = "Bearer " .. credential }
         if endpoint == "poll" then
            if etag ~= "" then headers["If-None-Match"] = '"' .. etag .. '"' end
            requests[#requests + 1] = wrk.format("GET", prefix .. "/" .. id .. "/desired", headers)
         else
            headers["Content-Type"] = "application/json"
            requests[#requests + 1] = wrk.format("POST", prefix .. "/" .. id .. "/status", headers, body)
         end
      end
   end
   assert(#requests > 0, "no devices in " .. fleet)
   -- each thread starts elsewhere in the fleet
   next_index = ((thread_number or 1) - 1) * math.floor(#requests / 8) % #requests
end

function request()
   next_index = next_index % #requests + 1
   return requests[next_index]
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests_)
   local counts = {}
   for _, thread in ipairs(threads) do
      for status, n in pairs(thread:get("statuses")) do
         counts[#counts + 1] = string.format('"%d": %d', status, n)
      end
   end
   local e = summary.errors
   io.write(string.format(
      'wrk-json {"requests": %d, "duration_us": %d, "socket_errors": %d, "timeouts": %d, "statuses": {%s}, '
         .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d, "max_us": %d, "mean_us": %.1f}\n',
      summary.requests, summary.duration, e.connect + e.read + e.write, e.timeout, table.concat(counts, ", "),
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
      latency.max, latency.mean))
end
