"""What comes back from the engine, checked: JSON modes, the JSON plan and verdict, client schemas within
bounds, function calling. Plain functions on plain data: no web framework, no database, no engine."""
