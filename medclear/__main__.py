from medclear.cli.main import main

main()
