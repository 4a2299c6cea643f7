"""How fast a run goes: batch sizing toward a target duration, health throttling, the rate ceiling.

May import `spec` and `errors`; never the protocol that calls it (it sees a run through its arguments).
"""
