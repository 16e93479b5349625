"""The kill switch (SPEC §7): which Agents a KillSwitch covers (`scope`), the control
channel to runtimes and gateways (`control`), engaging (`engage`) and releasing
(`release`). The Agent reconciler reads `scope` to keep covered Agents halted."""
