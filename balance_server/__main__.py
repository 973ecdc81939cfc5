from balance_server.cli import main

raise SystemExit(main())
