from ray_consensus.cli import main

main()
