from medclear.cli.main import app

app()
