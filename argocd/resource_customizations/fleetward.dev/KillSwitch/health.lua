-- Argo CD health of a Fleetward KillSwitch (fleetward.dev/v1alpha1, cluster-scoped), read
-- from the status the operator writes (operator/fleetward/operator/killswitch/engage.py,
-- release.py, handlers/killswitch.py):
--   engage:  phase Engaging (credentials revoked) -> Engaged (halt sent, draining) ->
--            Drained (Ready True, reason Engaged; observedGeneration is written only here)
--   release: phase Released (Ready True, reason Released; or Ready False, reason
--            KafkaUnavailable when the resume order could not be published)
--   staged:  no phase, Ready True, reason Disengaged
-- An engaged switch is a deliberate stop, not a fault: Suspended once it has taken
-- effect, like a suspended CronJob. Argo CD runs this without the string and math
-- libraries: only `..`, `#`, ipairs, table.insert and table.concat are used.

local function condition(status, kind)
  for _, c in ipairs(status.conditions or {}) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function describe(c)
  local text = c.type .. " " .. (c.reason or c.status)
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. c.message
  end
  return text
end

local function health(status, message)
  return {status = status, message = message}
end

local spec = obj.spec or {}
local status = obj.status or {}
local annotations = obj.metadata.annotations or {}
local ready = condition(status, "Ready")
local phase = status.phase

if spec.engaged then
  -- Who engaged it: the operator's copy, else the admission webhook's stamp (it is there
  -- from the moment the API server accepted the engage).
  local by = status.engagedBy or annotations["fleetward.dev/engaged-by"] or "unknown"
  local head = "Engaged by " .. by .. ": " .. (spec.reason or "no reason given") .. ". "
  local generation = obj.metadata.generation
  local drained = condition(status, "Drained")
  if drained ~= nil and drained.status == "False" and
      (drained.observedGeneration == nil or drained.observedGeneration == generation) then
    -- Credentials are revoked but the halt or the drain could not start (Kafka down): the
    -- stop is incomplete and the operator keeps retrying; on-call must know. (A Drained
    -- False of an earlier generation is a previous engagement's, not this one's.)
    return health("Degraded", head .. describe(drained))
  end
  local current = status.observedGeneration ~= nil and status.observedGeneration == generation
  if phase == "Drained" and current then
    return health("Suspended", head .. ((drained ~= nil and drained.message) or (ready ~= nil and ready.message) or ""))
  end
  if phase == "Engaged" then
    local agents = status.affectedAgents or 0
    return health("Progressing", head .. "Credentials revoked; waiting for " .. agents ..
      " agent(s) to drain, at most spec.drainTimeoutSeconds (" .. (spec.drainTimeoutSeconds or 30) .. " s).")
  end
  if phase == "Engaging" and ready ~= nil then
    return health("Progressing", head .. ready.message)
  end
  return health("Progressing", head .. "Waiting for the Fleetward operator to revoke the credentials of the agents " ..
    "it covers and halt them.")
end

if phase == "Engaging" or phase == "Engaged" or phase == "Drained" then
  local approvers = {}
  for _, approval in ipairs(spec.approvals or {}) do
    table.insert(approvers, approval.user)
  end
  local who = "Release requested"
  if #approvers > 0 then
    who = "Release approved by " .. table.concat(approvers, ", ")
  end
  return health("Progressing", who .. "; waiting for the Fleetward operator to give the agents fresh credentials " ..
    "and resume them.")
end
if ready ~= nil and ready.status == "False" then
  -- The release went through (agents reconciled) but a part of it failed, e.g. the
  -- resume order could not be published.
  return health("Degraded", describe(ready))
end
if ready ~= nil and ready.message ~= nil then
  return health("Healthy", ready.message)
end
-- Not engaged and not reported on yet: a staged switch does nothing, so nothing waits on it.
return health("Healthy", "Staged and not engaged.")
