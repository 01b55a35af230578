"""Mixed precision under a budget: candidates and their costs, per-layer sensitivities (Hutchinson
trace, Fisher, measured) with inter-layer dependency terms, an exact integer-programming allocator,
and an accuracy-targeted bisection that measures real quantized models (`lowbit search`)."""
