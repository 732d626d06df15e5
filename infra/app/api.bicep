// The function app on a Flex Consumption plan, and its app settings: the exact names shared/settings.py reads.
// Declared as plain resources rather than through the web/site module so that the offline checks (the unit test
// and checkov, which cannot fetch registry modules) see every property.
param name string
param planName string
param location string = resourceGroup().location
param tags object = {}

@description('Resource id of the user-assigned managed identity the app runs as.')
param identityId string
param identityClientId string

param storageAccountName string
param deploymentContainerName string
param appInsightsName string
param keyVaultName string
param keyVaultUri string

@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048
param maximumInstanceCount int = 40

param entraTenantId string
param entraClientId string
param entraAuthorityHost string
param entraRedirectUri string

@description('Key Vault secret holding the client secret; empty: federated credential of the managed identity.')
param entraClientSecretName string = ''

param allowedMailDomains string
param imapHost string
param imapPort int
param imapScope string
param collectSchedule string
param collectMaxConcurrency int
param collectTimeBudgetSeconds int
param collectMemoryBudgetMB int
param mailQueueName string
param mailContainerName string
param workQueueName string
param mailboxTableName string
param consentTableName string
param leaseContainerName string

@description('GLPI REST API URL; empty: the GLPI ticket consumer is disabled (AzureWebJobs.glpi_tickets.Disabled).')
param glpiUrl string = ''
param glpiAppTokenSecretName string
param glpiUserTokenSecretName string
param glpiStateTableName string
param glpiMailboxOptions string

resource storageAccount 'Microsoft.Storage/storageAccounts@2024-01-01' existing = {
  name: storageAccountName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

// Identity-based host storage: the Functions host and the app's own SDK clients use these URIs with the
// user-assigned identity; shared key access is disabled on the account.
var storageSettings = {
  AzureWebJobsStorage__blobServiceUri: storageAccount.properties.primaryEndpoints.blob
  AzureWebJobsStorage__queueServiceUri: storageAccount.properties.primaryEndpoints.queue
  AzureWebJobsStorage__tableServiceUri: storageAccount.properties.primaryEndpoints.table
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identityClientId
}

var monitoringSettings = {
  APPLICATIONINSIGHTS_CONNECTION_STRING: appInsights.properties.ConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'Authorization=AAD;ClientId=${identityClientId}'
}

var collectorSettings = {
  KEY_VAULT_URI: keyVaultUri
  AZURE_CLIENT_ID: identityClientId
  ENTRA_TENANT_ID: entraTenantId
  ENTRA_CLIENT_ID: entraClientId
  ENTRA_AUTHORITY_HOST: entraAuthorityHost
  ENTRA_REDIRECT_URI: entraRedirectUri
  ALLOWED_MAIL_DOMAINS: allowedMailDomains
  IMAP_HOST: imapHost
  IMAP_PORT: string(imapPort)
  IMAP_SCOPE: imapScope
  COLLECT_SCHEDULE: collectSchedule
  COLLECT_MAX_CONCURRENCY: string(collectMaxConcurrency)
  COLLECT_TIME_BUDGET_SECONDS: string(collectTimeBudgetSeconds)
  COLLECT_MEMORY_BUDGET_MB: string(collectMemoryBudgetMB)
  MAIL_QUEUE_NAME: mailQueueName
  MAIL_CONTAINER_NAME: mailContainerName
  WORK_QUEUE_NAME: workQueueName
  MAILBOX_TABLE_NAME: mailboxTableName
  CONSENT_TABLE_NAME: consentTableName
  LEASE_CONTAINER_NAME: leaseContainerName
}

// Secret mode only, and then only as a Key Vault reference that the platform resolves with the app's identity
// (keyVaultReferenceIdentity below); the value itself never appears in settings, templates or deployment history.
// The secret's name is passed as well: the app reads the secret's expiry date from Key Vault once a day and logs
// credential_expires_in_days=, which the expiry alert watches (an expired secret stops every mailbox).
var secretReference = {
  ENTRA_CLIENT_SECRET: '@Microsoft.KeyVault(VaultName=${keyVaultName};SecretName=${entraClientSecretName})'
  ENTRA_CLIENT_SECRET_NAME: entraClientSecretName
}
var secretSettings = empty(entraClientSecretName) ? {} : secretReference

// The GLPI tokens, like the client secret, are Key Vault references resolved with the app's identity. The function
// is switched off with the host's own per-function setting until a GLPI URL is given, so that an app deployed
// without GLPI leaves the mail queue to other consumers.
var glpiSettings = {
  GLPI_URL: glpiUrl
  GLPI_APP_TOKEN: '@Microsoft.KeyVault(VaultName=${keyVaultName};SecretName=${glpiAppTokenSecretName})'
  GLPI_USER_TOKEN: '@Microsoft.KeyVault(VaultName=${keyVaultName};SecretName=${glpiUserTokenSecretName})'
  GLPI_STATE_TABLE_NAME: glpiStateTableName
  GLPI_MAILBOX_OPTIONS: glpiMailboxOptions
  'AzureWebJobs.glpi_tickets.Disabled': empty(glpiUrl) ? 'true' : 'false'
}

var appSettings = union(storageSettings, monitoringSettings, collectorSettings, secretSettings, glpiSettings)

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  //checkov:skip=CKV_AZURE_225: a zone outage only delays collection (the next run resumes from the checkpoint)
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    tier: 'FlexConsumption'
    name: 'FC1'
  }
  properties: {
    reserved: true
  }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  //checkov:skip=CKV_AZURE_222: the admin's browser and Entra's form_post must reach the consent routes; no VNet here
  //checkov:skip=CKV_AZURE_17: a client certificate request would prompt the admin's browser on the consent pages
  //checkov:skip=CKV_AZURE_212: always-ready instances cost money at rest; timer and queue work tolerate a cold start
  //checkov:skip=CKV_AZURE_213: nothing for a health probe to evict on a plan that scales to zero between runs
  name: name
  location: location
  tags: union(tags, {
    'azd-service-name': 'api'
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    keyVaultReferenceIdentity: identityId
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storageAccount.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }
}

resource appSettingsConfig 'Microsoft.Web/sites/config@2024-04-01' = {
  // checkov runs its web-config checks on every sites/config resource; app settings carry none of those properties.
  //checkov:skip=CKV_AZURE_13: App Service Authentication would intercept the anonymous OAuth callback
  //checkov:skip=CKV_AZURE_63: HTTP logs are a web-config property; requests are traced in Application Insights
  //checkov:skip=CKV_AZURE_65: detailed error pages are a web-config property and stay off
  //checkov:skip=CKV_AZURE_66: failed request tracing is a web-config property; failures go to Application Insights
  //checkov:skip=CKV_AZURE_80: no .NET Framework in a Python app
  //checkov:skip=CKV_AZURE_88: Flex Consumption has no Azure Files content share; the package sits in a blob container
  //checkov:skip=CKV_AZURE_222: public network access is a site property, justified on the site above
  parent: functionApp
  name: 'appsettings'
  properties: appSettings
}

// No publishing passwords: azd deploys with an Entra token.
resource ftpCredentials 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: functionApp
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmCredentials 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: functionApp
  name: 'scm'
  properties: {
    allow: false
  }
}

output name string = functionApp.name
output resourceId string = functionApp.id
output uri string = 'https://${functionApp.properties.defaultHostName}'
