-- Argo CD health of a Fleetward Agent (fleetward.dev/v1alpha1), read from the status the
-- operator writes (operator/fleetward/operator/reconcile.py and conditions.py).
-- Argo CD runs this without the string and math libraries: only `..` and ipairs are used.

-- Reasons that stay until someone changes something (a spec, a Secret, a Guardrail), or
-- that mean the agent cannot work right now. KafkaUnavailable is one of them on purpose:
-- the operator retries after 1 s, doubling up to 30 s, so a blip shows for seconds, while
-- an outage long enough to be seen means the agent gets no requests (no topic) or cannot
-- log in (no Kafka user). Argo CD never turns Progressing into Degraded on its own for a
-- custom resource, so Progressing would hide that outage from on-call for as long as it
-- lasts. DeploymentNotAvailable is the runtime Deployment past its progress deadline
-- (Argo CD calls that Deployment Degraded too). NoSOPsSelected and RouteAgentNotFound are
-- reasons the operator defines but today reports inside a True ConfigResolved (the agent
-- works, with no SOP or with the fallback route); they are listed for when it does not.
local degradedReasons = {
  GuardrailNotFound = true,
  NoSOPsSelected = true,
  RouteAgentNotFound = true,
  SecretNotFound = true,
  SecretKeyNotFound = true,
  KafkaUnavailable = true,
  KeyNotPublished = true,
  DeploymentNotAvailable = true,
}

-- The conditions Ready summarizes, in the order the operator checks them.
local parts = {"ConfigResolved", "CredentialsIssued", "TopicReady", "Available"}

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

local generation = obj.metadata.generation
local status = obj.status
if status == nil or status.observedGeneration == nil then
  return health("Progressing", "Waiting for the Fleetward operator to reconcile the Agent")
end
if generation ~= nil and status.observedGeneration < generation then
  return health("Progressing", "Waiting for the Fleetward operator to reconcile generation " .. generation ..
    " (the status is of generation " .. status.observedGeneration .. ")")
end

local ready = condition(status, "Ready")
local halted = condition(status, "Halted")

-- A kill switch or spec.paused stopped the agent on purpose: Suspended, not a fault.
if status.phase == "Halted" or (halted ~= nil and halted.status == "True") then
  if halted ~= nil and halted.status == "True" and halted.message ~= nil then
    return health("Suspended", halted.message)
  end
  return health("Suspended", ready ~= nil and ready.message or "Halted by a KillSwitch")
end
if status.phase == "Paused" then
  return health("Suspended", ready ~= nil and ready.message or "spec.paused is true")
end

if ready ~= nil and ready.status == "True" then
  return health("Healthy", ready.message or "Ready")
end

for _, kind in ipairs(parts) do
  local c = condition(status, kind)
  if c ~= nil and c.status == "False" and degradedReasons[c.reason] then
    return health("Degraded", describe(c))
  end
end
if status.phase == "Degraded" then
  -- Whatever else the operator calls Degraded (ApplyFailed, InvalidSpec, a reason added
  -- later): the first failing part says most, else the Ready summary.
  for _, kind in ipairs(parts) do
    local c = condition(status, kind)
    if c ~= nil and c.status == "False" and kind ~= "Available" then
      return health("Degraded", describe(c))
    end
  end
  return health("Degraded", ready ~= nil and describe(ready) or "Degraded")
end

-- Pending: still coming up (Deployment rolling out, pods starting).
for _, kind in ipairs(parts) do
  local c = condition(status, kind)
  if c ~= nil and c.status ~= "True" then
    return health("Progressing", describe(c))
  end
end
return health("Progressing", ready ~= nil and describe(ready) or "Waiting for the runtime to become ready")
