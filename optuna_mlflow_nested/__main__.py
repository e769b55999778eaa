from optuna_mlflow_nested.cli import main

raise SystemExit(main())
