--[[
spark-slurm submit plugin (JobSubmitPlugins=lua; install next to slurm.conf).

Admits GPU power requests against the site policy compiled by
`sparkctl policy compile policy.yaml --lua spark_policy.lua` (same directory).
Runs inside slurmctld under its locks: no YAML, no subprocess, no network; the
only I/O is one line appended to the denial spool when a job is refused.

What it does for every job (docs/policy.md has the full semantics):
  * reads GPUs from tres_per_node (--gres, --gpus-per-node), tres_per_job
    (--gpus) and tres_per_task (--gpus-per-task), with `gres:` or `gres/`
    prefixes and typed GPUs (gpu:h100:4); `gpupower` (node watts) is a different
    GRES from `gpu` and is only read from tres_per_node;
  * applies the policy's ordered deny rules and the tightest of the matching
    tenant (account), partition, QOS, class and site limits;
  * injects gpupower = default watts per GPU x GPUs per node when none is asked;
  * writes `spark:v=1,...` into admin_comment for the node daemon;
  * refuses `scontrol update` changes to gpupower, to a governed job's GPUs,
    class or token.
Every entry point runs under pcall; a Lua error refuses the job when the fail
mode is "closed" and lets it through (logged) when "open".
Lua 5.1 (what slurmctld links), also valid on 5.3/5.4.
--]]

local FAIL_MODE_WITHOUT_POLICY = "closed"
-- Globals SPARK_POLICY_PATH and SPARK_SPOOL_PATH, when set before this file is
-- loaded, override where the policy is read and where denials go without one.
local SPOOL_WITHOUT_POLICY = SPARK_SPOOL_PATH or "/var/spool/spark/denials.jsonl"
local MAX_WATT_DIGITS = 9
local MAX_GPU_DIGITS = 6

local function script_dir()
  local info = debug.getinfo(1, "S")
  local src = info and info.source or ""
  if string.sub(src, 1, 1) == "@" then
    return string.match(string.sub(src, 2), "^(.*)/[^/]*$") or "."
  end
  return "."
end

local POLICY_PATH = SPARK_POLICY_PATH or (script_dir() .. "/spark_policy.lua")
local POLICY, LOAD_ERROR = nil, nil
do
  local ok, res = pcall(dofile, POLICY_PATH)
  if not ok then
    LOAD_ERROR = tostring(res)
  elseif type(res) ~= "table" or res.version ~= 1 or type(res.rules) ~= "table" then
    LOAD_ERROR = "not a version 1 spark policy table"
  else
    POLICY = res
  end
  if LOAD_ERROR then
    slurm.log_error("%s", "spark: cannot load policy " .. POLICY_PATH .. ": " .. LOAD_ERROR)
  end
end

local function fail_mode()
  return (POLICY and POLICY.fail_mode) or FAIL_MODE_WITHOUT_POLICY
end

local function int(n)
  return string.format("%.0f", n)
end

local function unset(v)
  return v == nil or v == 65534 or v == 65535 or v == 4294967294 or v == 4294967295
end

---------------------------------------------------------------- JSON spool

local function utf8_ok(s)
  local i, n = 1, #s
  while i <= n do
    local c = string.byte(s, i)
    local extra
    if c < 128 then extra = 0
    elseif c >= 194 and c <= 223 then extra = 1
    elseif c >= 224 and c <= 239 then extra = 2
    elseif c >= 240 and c <= 244 then extra = 3
    else return false end
    for k = 1, extra do
      local b = string.byte(s, i + k)
      if b == nil or b < 128 or b > 191 then return false end
    end
    i = i + extra + 1
  end
  return true
end

local function json_string(s)
  s = tostring(s)
  if string.find(s, "[\128-\255]") and not utf8_ok(s) then
    s = string.gsub(s, "[\128-\255]", "?")
  end
  s = string.gsub(s, '[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    return string.format("\\u%04x", string.byte(c))
  end)
  return '"' .. s .. '"'
end

local function json_value(v)
  if v == nil then return "null" end
  if type(v) == "number" then return int(v) end
  if type(v) == "boolean" then return tostring(v) end
  return json_string(v)
end

-- fields: ordered list of {key, value}; nested objects are pre-encoded with raw=true.
local function json_object(fields)
  local parts = {}
  for _, f in ipairs(fields) do
    local v = f[3] and f[2] or json_value(f[2])
    parts[#parts + 1] = json_string(f[1]) .. ":" .. v
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

local function spool_denial(job_desc, submit_uid, req, rule, reason)
  -- what the policy decided on, so `sparkctl replay --recheck` can decide it again
  local parts = req and req.partitions and table.concat(req.partitions, ",")
  local request = json_object({
    {"gpus", req and req.gpus}, {"watts", req and req.watts},
    {"tres_per_node", job_desc.tres_per_node}, {"tres_per_job", job_desc.tres_per_job},
    {"tres_per_task", job_desc.tres_per_task},
    {"partitions", parts}, {"qos", req and req.qos}, {"class", req and req.class},
  })
  local line = json_object({
    {"v", 1}, {"time_ns", os.time() * 1000000000}, {"decision", "deny"},
    {"rule", rule}, {"reason", reason}, {"user_id", submit_uid},
    {"user", job_desc.user_name}, {"account", job_desc.account},
    {"partition", job_desc.partition}, {"job_name", job_desc.name},
    {"request", request, true}, {"comment", job_desc.comment},
    {"policy_sha256", POLICY and POLICY.policy_sha256},
  })
  local path = (POLICY and POLICY.spool) or SPOOL_WITHOUT_POLICY
  local fh, err = io.open(path, "a")
  if not fh then
    slurm.log_error("%s", "spark: cannot append to denial spool " .. path .. ": " .. tostring(err))
    return
  end
  local ok, werr = fh:write(line, "\n")
  fh:close()
  if not ok then
    slurm.log_error("%s", "spark: cannot write denial spool " .. path .. ": " .. tostring(werr))
  end
end

---------------------------------------------------------------- GRES parsing

-- Reads one tres string into acc: gpus[where], prefix, power (node watts), errors.
local function parse_tres(s, where, acc)
  if s == nil or s == "" then return end
  for item in string.gmatch(s, "[^,]+") do
    local prefix, rest = "", item
    local head = string.sub(item, 1, 5)
    if head == "gres:" or head == "gres/" then
      prefix, rest = head, string.sub(item, 6)
    end
    local fields = {}
    for f in string.gmatch(rest, "[^:=]+") do fields[#fields + 1] = f end
    local name = fields[1]
    if name == "gpu" then
      local count = 1
      local last = fields[#fields]
      if #fields >= 2 and string.match(last, "^%d+$") then
        count = tonumber(last)
        if #last > MAX_GPU_DIGITS then
          acc.error = acc.error or ("'" .. item .. "' is not a plausible GPU count")
          count = 0
        end
      elseif #fields >= 3 then
        acc.error = acc.error or ("cannot read the GPU count in '" .. item .. "'")
      end
      acc.gpus[where] = (acc.gpus[where] or 0) + count
      if acc.prefix == nil then acc.prefix = prefix end
    elseif name == "gpupower" then
      if where ~= "node" then
        acc.error = acc.error or ("gpupower is node watts; ask for it per node with "
          .. "--gres=gpu:N,gpupower:W, not in '" .. item .. "'")
      elseif acc.power_item then
        acc.error = acc.error or "gpupower is given twice"
      else
        acc.power_item = item
        local value = fields[2]
        if #fields ~= 2 then
          acc.error = acc.error or ("'" .. item .. "' needs a whole number of node watts, "
            .. "e.g. gpupower:1600")
        elseif not string.match(value, "^%d+$") then
          acc.error = acc.error or ("'" .. item .. "': '" .. value
            .. "' is not a whole number of watts")
        elseif #value > MAX_WATT_DIGITS then
          acc.error = acc.error or ("'" .. item .. "': " .. value .. " W is not a plausible power")
        elseif tonumber(value) == 0 then
          acc.error = acc.error or ("'" .. item .. "': gpupower must be at least 1 W")
        else
          acc.power = tonumber(value)
        end
      end
    end
  end
end

-- GPUs per node, or nil and why not (multi-node --gpus / --gpus-per-task).
local function gpus_per_node(job_desc, acc)
  if acc.gpus.node and acc.gpus.node > 0 then return acc.gpus.node end
  local single = (unset(job_desc.min_nodes) or job_desc.min_nodes <= 1)
    and (unset(job_desc.max_nodes) or job_desc.max_nodes <= 1)
  if acc.gpus.job and acc.gpus.job > 0 then
    if single then return acc.gpus.job end
    return nil, "--gpus over several nodes leaves the GPUs per node unknown"
  end
  if acc.gpus.task and acc.gpus.task > 0 then
    if not unset(job_desc.ntasks_per_node) then
      return acc.gpus.task * job_desc.ntasks_per_node
    end
    if single then
      local tasks = unset(job_desc.num_tasks) and 1 or job_desc.num_tasks
      return acc.gpus.task * tasks
    end
    return nil, "--gpus-per-task over several nodes without --ntasks-per-node leaves "
      .. "the GPUs per node unknown"
  end
  return 0
end

local function workload_class(comment)
  if type(comment) ~= "string" then return nil end
  return string.match(comment, "spark:class=([%w_%.%-]+)")
end

local function default_partitions(job_desc, part_list)
  local list = {}
  if type(job_desc.partition) == "string" and job_desc.partition ~= "" then
    for p in string.gmatch(job_desc.partition, "[^,]+") do list[#list + 1] = p end
    return list
  end
  if type(part_list) == "table" then
    for _, part in pairs(part_list) do
      if type(part) == "table" and part.flag_default == 1 and part.name then
        list[#list + 1] = part.name
      end
    end
  end
  return list
end

---------------------------------------------------------------- decision

local function contains(list, value)
  if value == nil then return false end
  for _, v in ipairs(list) do
    if v == value then return true end
  end
  return false
end

local function matches(m, req)
  if m.account and not contains(m.account, req.account) then return false end
  if m.qos and not contains(m.qos, req.qos) then return false end
  if m.class and not contains(m.class, req.class) then return false end
  if m.partition then
    local any = false
    for _, p in ipairs(req.partitions) do
      if contains(m.partition, p) then any = true end
    end
    if not any then return false end
  end
  return true
end

-- Same order as spark_slurm.policy.evaluate: deny rules, then the tightest limit.
local function decide(P, req)
  local g = req.gpus
  local sources = {}
  for _, r in ipairs(P.rules) do
    if matches(r.match or {}, req) then
      if r.action == "deny" then
        return { action = "deny", rule = r.id, reason = r.reason .. " (rule " .. r.id .. ")" }
      end
      sources[#sources + 1] = { id = r.id, lim = r }
    end
  end
  if req.class and P.classes[req.class] then
    sources[#sources + 1] = { id = "class:" .. req.class, lim = P.classes[req.class] }
  end
  if req.qos and P.qos and P.qos[req.qos] then
    sources[#sources + 1] = { id = "qos:" .. req.qos, lim = P.qos[req.qos] }
  end
  for _, p in ipairs(req.partitions) do
    if P.partitions[p] then
      sources[#sources + 1] = { id = "partition:" .. p, lim = P.partitions[p] }
    end
  end
  if req.account and P.tenants[req.account] then
    sources[#sources + 1] = { id = "tenant:" .. req.account, lim = P.tenants[req.account] }
  end
  sources[#sources + 1] = { id = "gpu-limits", lim = {
    min_watts_per_gpu = P.min_watts_per_gpu, max_watts_per_gpu = P.max_watts_per_gpu,
    default_watts_per_gpu = P.default_watts_per_gpu, max_node_watts = P.node_max_watts,
    on_exceed = P.on_exceed } }

  for _, s in ipairs(sources) do
    if s.lim.max_gpus and g > s.lim.max_gpus then
      return { action = "deny", rule = s.id, reason = int(g) .. " GPUs per node is above the "
        .. "limit of " .. int(s.lim.max_gpus) .. " (rule " .. s.id .. ")" }
    end
  end
  local watts, origin, injected = req.watts, nil, false
  if watts == nil then
    for _, s in ipairs(sources) do
      if s.lim.default_watts_per_gpu then origin = s; break end
    end
    watts, injected = origin.lim.default_watts_per_gpu * g, true
  end
  local hi, hi_src, lo, lo_src, strict, strict_max = nil, nil, nil, nil, nil, nil
  for _, s in ipairs(sources) do
    local m = nil
    if s.lim.max_watts_per_gpu then m = s.lim.max_watts_per_gpu * g end
    if s.lim.max_node_watts and (m == nil or s.lim.max_node_watts < m) then
      m = s.lim.max_node_watts
    end
    if m and (hi == nil or m < hi) then hi, hi_src = m, s end
    if m and watts > m and s.lim.on_exceed == "deny" and strict == nil then
      strict, strict_max = s, m
    end
    if s.lim.min_watts_per_gpu then
      local n = s.lim.min_watts_per_gpu * g
      if lo == nil or n > lo then lo, lo_src = n, s end
    end
  end
  if lo > hi then lo = hi end
  local asked = "gpupower:" .. int(watts) .. " for " .. int(g) .. " GPU(s) per node"
  if injected then asked = "the default " .. asked end
  if watts > hi then
    if strict and not injected then
      return { action = "deny", rule = strict.id, reason = asked .. " is above the maximum "
        .. int(strict_max) .. " W (" .. int(math.floor(strict_max / g)) .. " W/GPU, rule "
        .. strict.id .. ")" }
    end
    return { action = "clamp", rule = hi_src.id, watts = hi, injected = injected,
      reason = asked .. " clamped to " .. int(hi) .. " W" }
  end
  if watts < lo then
    return { action = "clamp", rule = lo_src.id, watts = lo, injected = injected,
      reason = asked .. " raised to the minimum " .. int(lo) .. " W" }
  end
  local rule = injected and origin.id or hi_src.id
  return { action = "allow", rule = rule, watts = watts, injected = injected, reason = asked }
end

-- tres_per_node with the gpupower entry set to `watts` (added when absent).
local function with_power(tres, acc, watts)
  local entry = (acc.prefix or "gres:") .. "gpupower:" .. int(watts)
  if tres == nil or tres == "" then return entry end
  local out, replaced = {}, false
  for item in string.gmatch(tres, "[^,]+") do
    if item == acc.power_item and not replaced then
      out[#out + 1], replaced = entry, true
    else
      out[#out + 1] = item
    end
  end
  if not replaced then out[#out + 1] = entry end
  return table.concat(out, ",")
end

local function admit(job_desc, part_list, submit_uid)
  local P = POLICY
  local acc = { gpus = {} }
  parse_tres(job_desc.tres_per_node, "node", acc)
  parse_tres(job_desc.tres_per_job, "job", acc)
  parse_tres(job_desc.tres_per_task, "task", acc)
  local req = { watts = acc.power }
  if acc.error then
    return { action = "deny", rule = "request-invalid", reason = acc.error }, req, acc
  end
  local g, why = gpus_per_node(job_desc, acc)
  if g == nil then
    return { action = "deny", rule = "gpus-per-node-unknown", reason = why
      .. "; ask per node instead: --gres=gpu:N,gpupower:W" }, req, acc
  end
  req.gpus = g
  if g == 0 then
    if acc.power_item then
      return { action = "deny", rule = "power-without-gpus", reason = "'" .. acc.power_item
        .. "' asks for power but no GPUs; use --gres=gpu:N,gpupower:W in one --gres "
        .. "(a second --gres replaces the first)" }, req, acc
    end
    return nil, req, acc
  end
  req.account, req.qos = job_desc.account, job_desc.qos
  req.partitions = default_partitions(job_desc, part_list)
  req.class = workload_class(job_desc.comment)
  return decide(P, req), req, acc
end

local function token(d, req)
  local wpg = math.floor(d.watts / req.gpus)
  return "spark:v=1,watts=" .. int(d.watts) .. ",gpus=" .. int(req.gpus) .. ",wpg=" .. int(wpg)
    .. ",class=" .. (req.class or "-") .. ",rule=" .. d.rule .. ",policy="
    .. string.sub(POLICY.policy_sha256, 1, 16) .. ",injected=" .. (d.injected and "1" or "0")
end

local function refuse(job_desc, submit_uid, req, rule, reason)
  slurm.log_user("%s", "spark: job refused: " .. string.gsub(reason, "%c", " "))
  local ok, err = pcall(spool_denial, job_desc, submit_uid, req, rule, reason)
  if not ok then slurm.log_error("%s", "spark: denial spool failed: " .. tostring(err)) end
  return slurm.ERROR
end

local function submit(job_desc, part_list, submit_uid)
  if POLICY == nil then
    if fail_mode() == "open" then
      slurm.log_error("%s", "spark: policy not loaded; job let through (fail-open)")
      return slurm.SUCCESS
    end
    return refuse(job_desc, submit_uid, nil, "policy-not-loaded",
      "power policy not loaded, job refused (fail-closed)")
  end
  local d, req, acc = admit(job_desc, part_list, submit_uid)
  if d == nil then return slurm.SUCCESS end
  if d.action == "deny" then
    return refuse(job_desc, submit_uid, req, d.rule, d.reason)
  end
  if d.injected or d.action == "clamp" then
    job_desc.tres_per_node = with_power(job_desc.tres_per_node, acc, d.watts)
  end
  if d.action == "clamp" then
    slurm.log_user("%s", "spark: " .. d.reason .. " (rule " .. d.rule .. ")")
  end
  local t = token(d, req)
  local existing = job_desc.admin_comment
  if type(existing) == "string" and existing ~= "" then
    job_desc.admin_comment = existing .. " " .. t
  else
    job_desc.admin_comment = t
  end
  slurm.log_info("%s", "spark: admitted " .. t)
  return slurm.SUCCESS
end

function slurm_job_submit(job_desc, part_list, submit_uid)
  local ok, rc = pcall(submit, job_desc, part_list, submit_uid)
  if ok then return rc end
  slurm.log_error("%s", "spark: internal error in job_submit: " .. tostring(rc))
  if fail_mode() == "open" then return slurm.SUCCESS end
  slurm.log_user("%s", "spark: internal policy error, job refused (fail-closed)")
  pcall(spool_denial, job_desc, submit_uid, nil, "internal-error", tostring(rc))
  return slurm.ERROR
end

---------------------------------------------------------------- modify

local function spark_token(admin_comment)
  if type(admin_comment) ~= "string" then return nil end
  return string.match(admin_comment, "spark:v=1,[^%s]*")
end

local function mentions_gpu(s)
  if type(s) ~= "string" then return false end
  local acc = { gpus = {} }
  parse_tres(s, "node", acc)
  return acc.gpus.node ~= nil
end

local function modify(job_desc, job_rec, part_list, modify_uid)
  local asked = nil
  for _, key in ipairs({ "tres_per_node", "tres_per_job", "tres_per_task", "tres_per_socket",
                         "gres" }) do
    local v = job_desc[key]
    if v ~= nil and type(v) ~= "string" then error(key .. " is a " .. type(v)) end
    if v ~= nil and string.find(v, "gpupower", 1, true) then asked = v end
  end
  if asked then
    return "the power request (gpupower) cannot be changed with scontrol update ('" .. asked
      .. "'); use `sparkctl cap --job JOB --watts W`"
  end
  local tok = job_rec and spark_token(job_rec.admin_comment)
  if tok == nil then return nil end
  for _, key in ipairs({ "tres_per_node", "tres_per_job", "tres_per_task" }) do
    if mentions_gpu(job_desc[key]) then
      return "the GPUs of a power-governed job cannot be changed; resubmit it"
    end
  end
  if job_desc.comment ~= nil then
    local now = string.match(tok, ",class=([^,]*)") or "-"
    if (workload_class(job_desc.comment) or "-") ~= now then
      return "the workload class (spark:class=) cannot be changed after submission"
    end
  end
  if job_desc.admin_comment ~= nil and spark_token(job_desc.admin_comment) ~= tok then
    return "the spark: token in AdminComment is written by the submit plugin only"
  end
  return nil
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
  local ok, why = pcall(modify, job_desc, job_rec, part_list, modify_uid)
  if not ok then
    slurm.log_error("%s", "spark: internal error in job_modify: " .. tostring(why))
    if fail_mode() == "open" then return slurm.SUCCESS end
    slurm.log_user("%s", "spark: internal policy error, update refused (fail-closed)")
    return slurm.ERROR
  end
  if why == nil then return slurm.SUCCESS end
  local job_id = job_rec and job_rec.job_id or "?"
  slurm.log_error("%s", "spark: refused update of job " .. tostring(job_id) .. " by uid "
    .. tostring(modify_uid) .. ": " .. why)
  slurm.log_user("%s", "spark: update refused: " .. why)
  return slurm.ERROR
end

slurm.log_info("%s", "spark: job_submit.lua loaded, policy " .. POLICY_PATH
  .. (POLICY and (" sha256 " .. POLICY.policy_sha256) or " NOT loaded"))
return slurm.SUCCESS
