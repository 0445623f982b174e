"""Fault drills: break one part of the running stack under steady POS traffic, repair it,
and prove afterwards that nothing was lost or doubled (`medclear drill`, cli).

bounds (limits and DrillError) · access (the stack and its components) · persons (who
swipes, seeded) · traffic (steady swipes) · faults · checks · report (results, verdicts,
table) · run (one drill, the catalogue, the target stack) · hostile and fuzz (hostile
requests at the gateway) · cli (the commands).
"""
