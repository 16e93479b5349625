-- Argo CD health of a Fleetward Guardrail (fleetward.dev/v1alpha1), read from the status
-- the operator writes (operator/fleetward/operator/handlers/references.py: a Ready
-- condition and usedBy, for the generation it has seen). The API server's CEL rules and
-- the operator's webhook (patterns that do not compile) refuse an invalid Guardrail, so
-- the operator reports Ready True once it has taken one in; Ready False is handled all the
-- same, for a reason a later operator may add.
-- Argo CD runs this without the string and math libraries: only `..` and ipairs are used.

local function health(status, message)
  return {status = status, message = message}
end

local generation = obj.metadata.generation
local status = obj.status
if status == nil or status.observedGeneration == nil then
  -- Also what a Guardrail in a namespace no Fleetward installation watches looks like.
  return health("Progressing", "Waiting for the Fleetward operator to take in the Guardrail")
end
if generation ~= nil and status.observedGeneration < generation then
  return health("Progressing", "Waiting for the Fleetward operator to take in generation " .. generation ..
    " (the status is of generation " .. status.observedGeneration .. ")")
end

local ready = nil
for _, c in ipairs(status.conditions or {}) do
  if c.type == "Ready" then
    ready = c
  end
end
if ready == nil then
  return health("Progressing", "Waiting for the Fleetward operator to report Ready")
end
local message = ready.message or ""
if ready.status == "True" then
  return health("Healthy", message)
end
local text = "Ready " .. (ready.reason or ready.status)
if message ~= "" then
  text = text .. ": " .. message
end
if ready.status == "False" then
  return health("Degraded", text)
end
return health("Progressing", text)
