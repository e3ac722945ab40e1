from espc.cli.main import main

# The guard matters: multiprocessing spawn re-imports the main module in every worker.
if __name__ == "__main__":
    main()
