"""`python -m reader_agent`: the reader agent's commands without the rest of medclear's CLI
(what a POS PC runs; `medclear agent` is the same app)."""

from reader_agent.cli import agent_app

agent_app(prog_name="python -m reader_agent")
