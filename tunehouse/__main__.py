from tunehouse.cli import app

app()
