from medclear.cli import app

app()
