"""Policy compilation: Policy IR, MILP, batching DP, elastic scheduler, strategy evaluation,
the compile pipeline, artifacts and reports. Built on `espc.planner.sim`."""
