from acqhost.cli import main

raise SystemExit(main())
